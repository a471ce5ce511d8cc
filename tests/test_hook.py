"""saef as a DDP communication hook, on 2 and 3 gloo processes (tests/_hook_worker.py): with the identity
compressor it is DDP's own all-reduce bit for bit; with EF it is the definition (per parameter, from every
rank's gradient), across DDP's bucket rebuild, with AdamW on top; its state resumes bit-identically; a state
of another rank is refused."""

import json
import sys
from pathlib import Path

import pytest
import torch

import saef

sys.path.insert(0, str(Path(__file__).parent))
from _procs import launch, wait_all  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def hook_results(tmp_path_factory):
    results = {}
    for world in (2, 3):
        out = tmp_path_factory.mktemp(f"hook{world}")
        procs = launch([str(HERE / "_hook_worker.py"), str(out)], world)
        codes = wait_all(procs, timeout=300)
        assert codes == [0] * world, codes
        results[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_the_hook_is_ddp_with_identity_and_the_ef_definition_with_compression(hook_results, world):
    """6 AdamW steps of a 3-layer MLP in DDP buckets of 2 kB (rebuilt after the first iteration): identical
    to DDP without a hook (identity); within 1e-6 of EF written out per parameter (top-k 25 %, scaled sign;
    top-k double-way, whose server errors move to their parameters' new servers at the rebuild), with uplink
    bits counted; resumed from the hook's, the model's and AdamW's state after 3 steps, bit for
    bit equal, with the same bit counts; another rank's state refused; overlapped with backward (the
    exchange in the hook's thread), bit for bit the same as without."""
    for rank, found in enumerate(hook_results[world]):
        assert found["identity_equal"], rank
        for case in ("topk:0.25", "sign", "topk:0.25-double"):
            assert found[f"ef_{case}_diff"] < 1e-6, (rank, case, found[f"ef_{case}_diff"])
            assert found[f"ef_{case}_bits_up"] > 0 and found[f"ef_{case}_rebuilt"], (rank, case)
        assert found["resume_equal"] and found["resume_bits_equal"], rank
        assert found["overlap_closed"], rank
        assert found["overlap_equal"] and [t.split("_")[0] for t in found["overlap_threads"]] == ["saef-hook"], (rank, found)
        assert "each rank loads its own" in found["foreign_rank"]


def test_the_hook_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="use the saef.SAEF optimizer for SAEF"):
        saef.CommHookState(method="saef")
    with pytest.raises(ValueError, match="ef21 in the hook is single-way"):
        saef.CommHookState(method="ef21", double_way=True)
    with pytest.raises(ValueError, match="no module of this model is sharded with fully_shard"):
        saef.compress_replicas(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="method 'saef'"):
        saef.compress_replicas(torch.nn.Linear(2, 2), None, method="saef")


@pytest.mark.slow
def test_fsdp2_replica_exchange_is_hsdp_with_identity_and_ef_with_compression(tmp_path):
    """FSDP2 on CPU (gloo), 4 ranks as 2 replicas x 2 shards: the model sharded over the shard dimension with
    saef.compress_replicas taking the replica exchange through FSDP2's all-reduce hook. With the identity
    compressor, 5 AdamW steps end within 1e-6 of native HSDP; with EF and top-k 25 %, within 1e-6 of EF written
    out per piece of each unit's shard, with bits counted; a model sharded on the 2-D mesh (native HSDP) is
    refused."""
    procs = launch([str(HERE / "_fsdp_worker.py"), str(tmp_path)], 4)
    assert wait_all(procs, timeout=300) == [0, 0, 0, 0]
    for rank in range(4):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found["identity_diff"] < 1e-6, (rank, found)
        assert found["ef_diff"] < 1e-6 and found["ef_bits_up"] > 0, (rank, found)
        assert found["moved"] > 1e-4  # (EF with top-k is not HSDP: the comparison above is not vacuous)
        assert "already all-reduces the replicas" in found["hsdp_refused"]
