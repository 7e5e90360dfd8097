"""relexd beyond one host: a checkpoint's tensors computed by workers of a Ray cluster.

The per-tensor updates are independent, so the work splits across hosts by tensor
(:mod:`~relexd.cluster.partition`, balanced by bytes and recorded in the state). Each worker
(:mod:`~relexd.cluster.worker`) reads its share of the checkpoint from the shared file system and
writes its part of the new generation; the daemon stays the one coordinator — it watches, orders,
combines the per-tensor figures in tensor order and commits, exactly as on one host.
:mod:`~relexd.cluster.ray_backend` is the only module that imports ``ray`` (the ``relexd[ray]``
extra); nothing on the single-host path imports this package's Ray module.
"""
