"""Sharders for the model's two embedding modules.

TorchRec's EmbeddingCollection sharder offers data_parallel / table_wise / column_wise / row_wise on
every device. Its EmbeddingBagCollection sharder withholds row_wise on CPU; the override below adds it
back, so a very large user table can be split by rows on a CPU cluster too (its output is checked
equal to the unsharded module in tests/test_sharding.py).
"""

from typing import Any, Dict, List, Optional

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType


class RowWiseCpuEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """EmbeddingBagCollection sharder that also offers ``row_wise`` when the compute device is CPU."""

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def make_sharders(fused_params: Optional[Dict[str, Any]] = None, row_wise_on_cpu: bool = True) -> List[ModuleSharder[nn.Module]]:
    """[EBC sharder, EC sharder]. ``fused_params`` go to the fused kernels (e.g. an optimizer); when the
    parameters carry an in-backward optimizer (``apply_optimizer_in_backward``) leave it None."""
    ebc_cls = RowWiseCpuEmbeddingBagCollectionSharder if row_wise_on_cpu else EmbeddingBagCollectionSharder
    return [ebc_cls(fused_params=fused_params), EmbeddingCollectionSharder(fused_params=fused_params)]
