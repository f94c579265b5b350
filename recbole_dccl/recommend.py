"""What a trained model recommends to a user: per user, the device model's top-K beside the cloud model's.

    python -m recbole_dccl.recommend --model_file=saved/DCCL-Nov-21-2026_10-00-00.pth --users=1,2,3 --k=10

Users and items are named by their tokens in the dataset's files. Each item also shows its value of an item
field of the dataset's ``.item`` file (``--item_field``; default: the file's first field after the item id, such
as ml-100k's ``movie_title``). A DCCL run saved two models: ``--reading=deployed`` (the default), the model after
the last phase, or ``--reading=selected``, the phase that scored best in the device view on valid
(:func:`~recbole_dccl.quick_start.read_checkpoint`). For a DCCL model a first line names the reading and its
phase and says how many devices adopted their patch, and each user's line gives the norm of the metapatch the
device view runs and whether the device adopted its patch (it kept a nonzero metapatch, one that won on its
held-out rows, in its last device phase before that phase); a plain RecBole model's checkpoint gives its one
top-K. Items are ranked as RecBole's ``full_sort_topk`` ranks them, from each user's test-split input (for
sequential models the history before the test item).
"""

import argparse
import os
import sys

import pandas as pd
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils.case_study import full_sort_topk

from recbole_dccl.errors import InputError
from recbole_dccl.quick_start import load_from_checkpoint, read_checkpoint


def user_ids(dataset, tokens, test_data):
    """The internal ids of user ``tokens``; an unknown token, or a user without a test row to rank from, is
    refused naming it."""
    known = dataset.field2token_id[dataset.uid_field]
    unknown = [token for token in tokens if token not in known]
    if unknown:
        examples = ", ".join(list(dataset.field2id_token[dataset.uid_field][1:4]))
        raise InputError(
            f"users: {unknown} not in dataset [{dataset.dataset_name}]; give user tokens as in its files, e.g. {examples}."
        )
    ids = [known[token] for token in tokens]
    if test_data.is_sequential:
        tested = set(test_data.dataset.inter_feat[dataset.uid_field].tolist())
        missing = [token for token, uid in zip(tokens, ids) if uid not in tested]
        if missing:
            raise InputError(f"users: {missing} have no row in the test split to rank items from.")
    return ids


def item_labels(config, field):
    """``{item token: value of field}`` from the dataset's ``.item`` file; ``field=None``: its first field after
    the item id. Empty when the dataset has no ``.item`` file or ``field`` is ``"none"``."""
    path = os.path.join(config["data_path"], f"{config['dataset']}.item")
    if field == "none" or not os.path.isfile(path):
        return {}
    table = pd.read_csv(path, delimiter=config["field_separator"], dtype=str, encoding=config["encoding"], engine="python")
    table.columns = [column.split(":")[0] for column in table.columns]
    others = [column for column in table.columns if column != config["ITEM_ID_FIELD"]]
    field = field or (others[0] if others else None)
    if field is None:
        return {}
    if field not in others:
        raise InputError(f"item_field: [{field}] is not a field of [{path}]; it must be one of {others} or 'none'.")
    return dict(zip(table[config["ITEM_ID_FIELD"]], table[field].fillna("")))


def top_items(model, users, test_data, k, config):
    """``{view: [[item id, ...] per user]}``: a DCCL model's device and cloud views, a plain model's one list."""
    if not isinstance(test_data, FullSortEvalDataLoader):
        raise InputError(
            f"model [{config['model']}] is evaluated on labelled rows (eval_args mode: {config['eval_args']['mode']}); "
            "a top-K over all items needs a model evaluated in mode full (a sequential or general recommender)."
        )
    views = model.VIEWS[::-1] if getattr(model, "is_dccl", False) else (config["model"],)
    lists = {}
    for view in views:
        if view in getattr(model, "VIEWS", ()):
            model.view = view
        _, items = full_sort_topk(users, model, test_data, k, device=config["device"])
        lists[view] = items.tolist()
    return lists


def adoption(checkpoint, model):
    """What a DCCL checkpoint's devices run: its ``reading``, ``round`` and ``phase`` (``None`` for a checkpoint
    that records none), the number of ``devices`` (users) and of those that ``adopted`` their patch."""
    adopted = (model.uploaded_metapatch[1:] != 0).any(dim=1)  # row 0: RecBole's padding user
    return {
        **{key: checkpoint.get(key) for key in ("reading", "round", "phase")},
        "devices": len(adopted),
        "adopted": int(adopted.sum()),
    }


def recommend(model_file, user_tokens, k=10, item_field=None, reading=None):
    """``(summary, rows)``: for a DCCL model its :func:`adoption` (``None`` for a plain model), and per user token
    a dict: ``user``, ``top`` (``{view: [(item token, label), ...]}``) and for DCCL ``metapatch_norm`` and
    ``adopted``. ``reading``: which model of a DCCL run (:func:`~recbole_dccl.quick_start.read_checkpoint`)."""
    path, checkpoint = read_checkpoint(model_file, reading)
    config, model, dataset, _, _, test_data = load_from_checkpoint(path, checkpoint, verbose=False)
    if k < 1 or k >= dataset.item_num:
        raise InputError(f"k: [{k}] must be an integer from 1 to {dataset.item_num - 1} (the dataset's items).")
    users = user_ids(dataset, user_tokens, test_data)
    labels = item_labels(config, item_field)
    lists = top_items(model, users, test_data, k, config)
    named = lambda ids: [(token, labels.get(token, "")) for token in dataset.id2token(dataset.iid_field, ids)]
    rows = []
    for index, (token, uid) in enumerate(zip(user_tokens, users)):
        row = {"user": token, "top": {view: named(items[index]) for view, items in lists.items()}}
        if getattr(model, "is_dccl", False):
            row["metapatch_norm"] = float(model.metapatch[uid].norm())
            row["adopted"] = bool(torch.any(model.uploaded_metapatch[uid] != 0))
        rows.append(row)
    return (adoption(checkpoint, model) if getattr(model, "is_dccl", False) else None), rows


def format_summary(summary):
    """The first line for a DCCL model: which model, and how many devices adopted their patch."""
    model = "model"
    if summary["reading"]:
        model = f"{summary['reading']} model (round {summary['round']} {summary['phase']})"
    line = f"{model}: {summary['adopted']} of {summary['devices']} devices adopted their patch"
    if summary["round"] == 0:
        line += "; no device phase had run, every device runs the cloud model"
    elif summary["phase"] == "shared":
        line += "; after step 2 every device runs the auxiliary encoder's metapatch"
    return line


def format_user(row, width=36):
    """One user's heading and its top-K lists side by side, one rank a line."""
    heading = f"user {row['user']}"
    if "adopted" in row:
        heading += f"  (metapatch norm {row['metapatch_norm']:.4f}, adopted its patch: {'yes' if row['adopted'] else 'no'})"
    cell = lambda item: f"{item[0]}  {item[1]}".strip()[:width].ljust(width)
    views = list(row["top"])
    lines = [heading, "rank  " + "".join(view.ljust(width + 2) for view in views).rstrip()]
    for rank, items in enumerate(zip(*row["top"].values()), start=1):
        lines.append(f"{rank:>4}  " + "  ".join(cell(item) for item in items).rstrip())
    return "\n".join(lines)


def parse_users(text):
    tokens = [token.strip() for token in text.split(",") if token.strip()]
    if not tokens:
        raise InputError(f"users: [{text}] names no user; give user tokens separated by commas, e.g. --users=1,2,3.")
    return tokens


def main(argv=None):
    """The command line; a bad file, reading, user, ``k`` or item field ends it with its message and status 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_file", required=True, help="a checkpoint written through recbole_dccl (saved/)")
    parser.add_argument("--users", required=True, help="user tokens separated by commas, e.g. 1,2,3")
    parser.add_argument("--k", type=int, default=10, help="items per list")
    parser.add_argument("--item_field", default=None, help="field of the .item file shown per item, or 'none'")
    parser.add_argument("--reading", default=None, help="model of a DCCL run: deployed (default, the model after the "
                        "last phase) or selected (the phase best on valid)")
    args = parser.parse_args(argv)
    try:
        summary, rows = recommend(args.model_file, parse_users(args.users), args.k, args.item_field, args.reading)
    except InputError as error:
        print(f"recommend: error: {error}", file=sys.stderr)
        return 2
    if summary is not None:
        print(format_summary(summary) + "\n")
    print("\n\n".join(format_user(row) for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
