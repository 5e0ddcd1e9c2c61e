"""What a new user met with `forget` (probe107): empty id elements, --now --wait, the --no-event note."""

from __future__ import annotations

import pytest

from flows.cli import main
from obliviate.unlearning.service import RequestError, parse_ids
from storage import ObjectStore
from storage.ledger import DeletionLedger


@pytest.mark.parametrize(
    ("typed", "fix"), [("3,,4", "--ids 3,4."), ("3,", "--ids 3."), (",3", "--ids 3."), ("3, ,4", "--ids 3,4.")]
)
def test_an_empty_id_element_is_refused_not_dropped(tmp_path, capsys, typed, fix) -> None:
    """`--ids 3,,4` was read as [3, 4] and `--ids 3,` as [3]: an empty element may be an id the user dropped."""
    with pytest.raises(RequestError, match="with an id between every two commas; got an empty element"):
        parse_ids(typed)
    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()
    assert main(["forget", "--store", url, "--ids", typed, "--data", "digits", "--no-event"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("obliviate forget: error: rule: ids are comma-separated") and repr(typed) in said
    assert said.rstrip().endswith(f"remove the extra comma: {fix}") and "Traceback" not in said
    assert DeletionLedger(ObjectStore(url)).request_ids() == []  # nothing filed
    # spaces still separate ids, as before
    assert parse_ids(" 5, 6") == (5, 6) and parse_ids("3 17, 42") == (3, 17, 42)
