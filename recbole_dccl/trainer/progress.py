"""RecBole-style progress bars for DCCL's phases."""

from recbole.utils import set_color
from tqdm import tqdm


def progress(iterable, description, show, total=None):
    """``iterable`` behind a tqdm bar labelled like RecBole's ``Train   3`` bars, when ``show``."""
    if not show:
        return iterable
    return tqdm(iterable, total=total, ncols=100, desc=set_color(f"{description:>12}", "pink"))
