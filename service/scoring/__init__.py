"""Offline batch scoring: many images → one row each, exactly once, resumable.

    python -m service.scoring --model models/demo --input photos/ --output scores/

Engines: ``local`` (in-process, the default), ``grpc`` (a running server) and ``ray``
(Ray Data actors, on a cluster when one machine is not enough). They share the job logic
in ``service.scoring.job``: the input list is fixed and numbered, results are committed in
numbered shards, each written atomically, and a rerun skips the shards already there.
"""
