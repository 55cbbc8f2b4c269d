"""Instructions from a dataset: a Hub dataset id, a local dataset folder or a .parquet file, read
through the `datasets` library; one column out.

Consumes `data.instructions` (anything but the .jsonl/.txt files that data.py reads line by line),
`data.split` and `data.column`. Produces the column's texts, one per row (empty rows as "", so that a
row's index stays its id), and each row's "category" when the dataset has that column.

A Hub id is fetched with huggingface_hub's `snapshot_download` into the Hugging Face cache, as the policy
is (once; offline, the cached copy is read), and its folder is then read like a local one. Every mistake
is one `UserError` line, raised before any model loads: the loop reads its instructions first.
"""

from pathlib import Path

from minitpo.errors import UserError

COLUMNS = ("instruction", "prompt", "messages", "conversations")  # data.column's default: the first present
USER_ROLES = ("user", "human")  # a chat turn's role (OpenAI "role") or speaker (ShareGPT "from")
DATA_FILES = ["*.parquet", "*.json", "*.jsonl", "*.csv", "*.arrow", "README.md"]  # what a Hub id downloads
FIX = "give a .jsonl/.txt/.parquet file, a dataset folder or a Hub dataset id (org/name)"


def load_dataset_column(source: str, split: str, column: str | None) -> tuple[list[str], list[str]]:
    """(texts, categories) of `source`'s `split`, one per row; `column` None picks the first of COLUMNS."""
    dataset = _open(source, split)
    names = list(dataset.column_names)
    if column is None:
        column = next((c for c in COLUMNS if c in names), None)
        if column is None:
            raise UserError(f"data.column: {source} has none of the columns {', '.join(COLUMNS)} (it has "
                            f"{', '.join(names)}); set data.column to the one holding the instructions")
    elif column not in names:
        raise UserError(f"data.column: {column!r} is not a column of {source} (it has {', '.join(names)}); "
                        "pick one of those")
    texts = [instruction_text(value, column) for value in dataset[column]]
    categories = [str(c or "") for c in dataset["category"]] if "category" in names else [""] * len(texts)
    return texts, categories


def instruction_text(value, column: str) -> str:
    """A row's instruction: the text itself, or from a chat (a list of turns) its first user turn."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(turn, dict) for turn in value):
        for turn in value:
            speaker = turn.get("role", turn.get("from"))
            text = turn.get("content", turn.get("value"))
            if speaker in USER_ROLES and isinstance(text, str):
                return text
        return ""  # a chat without a user turn has no instruction: counted as empty
    raise UserError(f"data.column: {column!r} holds {type(value).__name__} values, not text or chat turns; "
                    "pick the column holding the instructions")


def _open(source: str, split: str):
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            if path.suffix != ".parquet":
                raise UserError(f"data.instructions: {source!r} is a {path.suffix or 'suffix-less'} file; {FIX}")
            return datasets.load_dataset("parquet", data_files=str(path), split="train")  # one file, one split
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # save_to_disk output
            saved = datasets.load_from_disk(str(path))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise UserError(f"data.split: {split!r} is not a split of {source} (it has "
                                    f"{', '.join(saved)}); pick one of those")
                return saved[split]
            return saved
        folder = str(path) if path.is_dir() else _download(source)
        return datasets.load_dataset(folder, split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise UserError(f"data.split: {split!r} is not a split of {source} "
                            f"({str(e).splitlines()[0][:160]}); pick one of those") from None
        raise UserError(f"data.instructions: {source!r} could not be read as a dataset "
                        f"({str(e).splitlines()[0][:160]}); {FIX}") from None
    except datasets.exceptions.DatasetGenerationError as e:  # a file that does not parse, or files that disagree
        cause = str(e.__cause__ or e).splitlines()[0][:160]
        raise UserError(f"data.instructions: {source!r} could not be read as a dataset ({cause}); {FIX}") from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        raise UserError(f"data.instructions: {source!r} holds no data files ({str(e).splitlines()[0][:160]}); "
                        f"{FIX}") from None


def _download(repo_id: str) -> str:
    """The local folder of Hub dataset `repo_id`'s data files: downloaded into the Hugging Face cache
    once, read from there offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise UserError(f"data.instructions: {repo_id!r} does not exist; {FIX}")
    try:
        return snapshot_download(repo_id, repo_type="dataset", allow_patterns=DATA_FILES)
    except HFValidationError:
        reason = "is not a valid Hub id"
    except RepositoryNotFoundError:
        reason = "is not a dataset on the Hub (or it is private and no token is set)"
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "huggingface.co cannot be reached"
        reason = f"is not in the local Hugging Face cache and {why}"
    raise UserError(f"data.instructions: {repo_id!r} {reason}; {FIX}, or download it first "
                    f"(hf download {repo_id} --repo-type dataset)")
