"""Training beyond one GPU: context (sequence) parallelism over torch.distributed.

`selective_scan_cp` splits the scan's sequence over a process group; `previous_inputs` is the
causal conv's halo exchange that `Mamba(cp_group=...)` uses; `shard_for_next_token` cuts a
language-model batch into this rank's inputs and labels. Data parallelism (DDP, FSDP2) needs
nothing of ours beyond `Parameterization.param_groups`, which keys roles by names.
`torchrun --nproc-per-node 4 -m ssm_kernels train --cp 2` trains a small model both ways at once.
"""

from .context_parallel import (all_gather_with_grad, previous_inputs, selective_scan_cp, shard_for_next_token,
                               shard_lengths)

__all__ = ["all_gather_with_grad", "previous_inputs", "selective_scan_cp", "shard_for_next_token", "shard_lengths"]
