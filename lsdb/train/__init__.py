"""Training: data sets, models, the trainer and parent–child spawning."""

#: Classes of each built-in data set: a fine-tune's classes are checked against it at load
#: (``lsdb.train.data``), and the findings read C from it (F9, F15). Here, not in ``data``, so the
#: findings need not import torch to read it.
NUM_CLASSES = {"mnist1d": 10, "digits": 10, "cifar10": 10}
