"""Throw-away servers on loopback, started as child processes and stopped by their process ids.

``seaweedfs``: an S3 server (``SeaweedFS``); ``ray_cluster``: a two-node Ray cluster (``LoopbackCluster``).
Why a package of its own: ``mzsane bench`` starts them at run time (S3 and two-node figures) and the test
fixtures (``tests/fixtures/s3.py``, ``tests/fixtures/ray_cluster.py``) start the same servers the same way,
so they ship with mzsane; they are neither a benchmark nor a stage of the pipeline.
"""
