"""``convert_rec.py make-pairs``: balanced, alternating, distinct, seeded pairs of identity folders, that
``make-bin`` reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sface_dist.data.bin_pack import read_bin
from sface_dist.data.convert import pair_list

from training_runs import tool


def identity_folders(root: Path, images: dict[str, int]) -> Path:
    for name, count in images.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            Image.new("RGB", (112, 112), (index * 20, len(name) * 30, 90)).save(root / name / f"{index}.jpg")
    return root


def test_pairs_are_balanced_alternating_distinct_and_seeded(tmp_path: Path) -> None:
    root = identity_folders(tmp_path / "faces", {"ann": 4, "bob": 3, "cy": 1, "dee": 2})
    pairs = pair_list(root, 12, seed=3)
    assert [same for _, _, same in pairs] == [True, False] * 6
    assert len({(a, b) for a, b, _ in pairs}) == 12 and all(a < b for a, b, _ in pairs)
    for first, second, same in pairs:
        assert (root / first).is_file() and (root / second).is_file()
        assert (first.split("/")[0] == second.split("/")[0]) == same
    assert pair_list(root, 12, seed=3) == pairs and pair_list(root, 12, seed=4) != pairs


def test_the_command_writes_what_make_bin_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = identity_folders(tmp_path / "faces", {"ann": 3, "bob": 3, "cy": 2})
    convert = tool("convert_rec").main
    assert convert(["make-pairs", str(root), str(tmp_path / "pairs.txt"), "--pairs", "8", "--quiet"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'pairs.txt'}: 8 pairs (4 of one identity) of {root}\n"
    assert convert(["make-bin", str(tmp_path / "pairs.txt"), str(root), str(tmp_path / "v.bin"), "--quiet"]) == 0
    assert read_bin(tmp_path / "v.bin").issame.tolist() == [True, False] * 4


@pytest.mark.parametrize(("count", "problem"), [
    (7, "--pairs 7: an even number >= 2 (half of one identity, half of two)"),
    (10, "{root}: 2 identities hold 4 distinct pairs of one identity, fewer than the 5 asked for: ask for fewer, "
         "or add images"),
])
def test_what_cannot_be_drawn_is_one_line(tmp_path: Path, count: int, problem: str) -> None:
    root = identity_folders(tmp_path / "faces", {"ann": 3, "bob": 2})
    with pytest.raises(ValueError) as raised:
        pair_list(root, count)
    assert str(raised.value) == problem.format(root=root)
    (root / "ann" / "0.jpg").rename(root / "ann" / "a b.jpg")
    with pytest.raises(ValueError, match=r"a b.jpg: white space in the path, which a pair line cannot hold"):
        pair_list(root, 2)
