"""The experiment kit: datasets (:mod:`.data`) and reference models (:mod:`.models`).

Not part of the compression library proper: the benchmarks, the ``train`` and ``demo`` commands
and the tests use it to get MNIST-style data and small MLP/CNN/ViT models. The ``digits`` dataset
needs the ``[zoo]`` extra (scikit-learn); everything else needs only the core install.
"""
