"""The device side of recbole_dccl on ONNX Runtime: score with the shared device model and train the user's
metapatch, with ``onnxruntime`` and numpy alone, as a phone would (no torch, no RecBole, no recbole_dccl).

The files come from ``python -m recbole_dccl.export --format=onnx``: ``device_model.onnx``
(:class:`dccl_device.scoring.Scorer`), ``device_training/`` (:func:`dccl_device.training.train_metapatch`) and
``metapatch/<user>.npz`` (:mod:`dccl_device.files`, which the export writes with). ``python -m dccl_device
score|train ...`` runs either on one user's files; docs/deployment.md, "On ONNX Runtime".

Nothing is imported here, so that :mod:`dccl_device.files` needs numpy only.
"""
