"""Scoring on the device: the shared device model (``device_model.onnx``) run by ``onnxruntime``."""

import numpy as np
import onnxruntime


class Scorer:
    """``Scorer(path)(metapatch, data)``: the device model's output for the rows of ``data`` (field -> array, one
    row per entry; further arrays are ignored) under the user's ``metapatch`` (``[k]``): scores over all items
    ``[rows, n_items]`` for a sequential backbone, one logit per row for a CTR backbone."""

    def __init__(self, path):
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.features = [name for name in names if name != "metapatch"]

    def __call__(self, metapatch, data):
        rows = len(data[self.features[0]])
        feeds = {name: data[name] for name in self.features}
        feeds["metapatch"] = np.tile(np.asarray(metapatch, dtype=np.float32).reshape(1, -1), (rows, 1))
        return self.session.run(None, feeds)[0]
