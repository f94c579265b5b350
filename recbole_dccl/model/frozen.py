"""A model held still: what the device phase, MoMoDistill's teachers and the memory's fit run the shared model as."""

from contextlib import contextmanager


@contextmanager
def frozen(model):
    """Eval mode and no parameter gradients inside; restored after."""
    training = model.training
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(training)
