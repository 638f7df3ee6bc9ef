"""lightning-ema's benchmark: one module per family of tables, one entry point (``python -m bench``).

- :mod:`bench.update`: the update per optimizer step against the peers (1a, 1b), where its time goes (1c), and
  lightning-ema's variants (4);
- :mod:`bench.swap`: the validation swap (2);
- :mod:`bench.fit`: what the EMA adds to a ``Trainer.fit`` step (3, 3b);
- :mod:`bench.gpu`: the same on a CUDA device (G1, G2; only where one is present);
- :mod:`bench.peers`: the peers and their updates; :mod:`bench.common`: timing, formatting, models, settings.
"""
