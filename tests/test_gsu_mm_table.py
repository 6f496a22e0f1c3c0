"""The frozen multimodal table (model/gsu/table.py): memory-mapped load, dtype conversion, row norms, bad files."""

import numpy as np
import pytest
import torch

from common.errors import DataError, UserError
from model.gsu import cosine_topk
from model.gsu.table import MMTable, row_norms


def write_table(path, rows: int = 50, dim: int = 16, seed: int = 0) -> np.ndarray:
    array = np.random.default_rng(seed).integers(-127, 128, size=(rows, dim), dtype=np.int8)
    array[0] = 0
    array[7] = 0  # an item without content
    np.save(path, array)
    return array


def test_int8_table_is_memory_mapped_frozen_and_normalised(tmp_path):
    array = write_table(tmp_path / "mm_table.npy")
    mm = MMTable.load(str(tmp_path), expected_dim=16)  # a prepared dataset directory
    assert mm.dtype == torch.int8 and mm.num_rows == 50 and mm.dim == 16
    assert isinstance(np.load(tmp_path / "mm_table.npy", mmap_mode="r"), np.memmap)
    assert torch.equal(mm.table, torch.from_numpy(array))
    assert not isinstance(mm.table, torch.nn.Parameter) and not mm.table.requires_grad
    expected = (torch.from_numpy(array).double() ** 2).sum(1)
    assert torch.equal(mm.norms.sq_norm.double(), expected)
    nonzero = expected[expected > 0].sqrt()
    assert mm.norms.min_norm == pytest.approx(float(nonzero.min())) and mm.norms.max_norm == pytest.approx(float(nonzero.max()))
    assert mm.norms.sq_norm[7] == 0 and mm.norms.sq_norm[0] == 0


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_converted_tables_hold_value_over_127(tmp_path, dtype, torch_dtype):
    array = write_table(tmp_path / "t.npy")
    mm = MMTable.load(str(tmp_path / "t.npy"), dtype=dtype)
    assert mm.dtype == torch_dtype
    assert torch.allclose(mm.table.float(), torch.from_numpy(array).float() / 127, atol=4e-3, rtol=0)
    assert torch.equal(mm.norms.sq_norm, row_norms(mm.table).sq_norm)
    hist = torch.randint(1, 50, (3, 40), generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([1, 2, 3])
    as_int8 = cosine_topk(torch.from_numpy(array), targets, hist, 10)
    converted = cosine_topk(mm.table, targets, hist, 10, norms=mm.norms)
    assert torch.allclose(as_int8[0], converted[0], atol=1e-2) and torch.equal(as_int8[2], converted[2])


def test_the_table_takes_no_gradient(tmp_path):
    write_table(tmp_path / "t.npy")
    mm = MMTable.load(str(tmp_path / "t.npy"), dtype="float32")
    scores, _, _ = cosine_topk(mm.table, torch.tensor([1]), torch.tensor([[2, 3, 4]]), 2, norms=mm.norms)
    assert not scores.requires_grad and mm.table.grad is None
    trainable = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="table"):
        MMTable(trainable)
    with pytest.raises(ValueError, match="table"):
        cosine_topk(trainable, torch.tensor([1]), torch.tensor([[1, 2]]), 1)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="no multimodal table"):
        MMTable.load(str(tmp_path / "missing"))
    write_table(tmp_path / "mm_table.npy", dim=16)
    with pytest.raises(DataError, match="expected mm_dim 128"):
        MMTable.load(str(tmp_path), expected_dim=128)
    with pytest.raises(UserError, match="--mm-dtype"):
        MMTable.load(str(tmp_path), dtype="float16")
    np.save(tmp_path / "float.npy", np.zeros((4, 16), dtype=np.float32))
    with pytest.raises(DataError, match="int8"):
        MMTable.load(str(tmp_path / "float.npy"))
    bad = np.ones((4, 16), dtype=np.int8)
    np.save(tmp_path / "row0.npy", bad)
    with pytest.raises(DataError, match="row 0"):
        MMTable.load(str(tmp_path / "row0.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="junk.npy"):
        MMTable.load(str(tmp_path / "junk.npy"))


def test_row_norms_of_an_all_zero_table():
    norms = row_norms(torch.zeros(5, 3, dtype=torch.int8))
    assert norms.min_norm == norms.max_norm == 1.0 and not norms.sq_norm.any()
    scores, positions, valid = cosine_topk(torch.zeros(5, 3, dtype=torch.int8), torch.tensor([1]), torch.tensor([[1, 2, 0]]), 2)
    assert valid[0].tolist() == [True, True] and positions[0].tolist() == [1, 0] and not scores.any()
