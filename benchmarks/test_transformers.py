"""A training step (forward, backward, AdamW) of transformers' MambaForCausalLM, patched by
apply_to_transformers against transformers' own path (on a CPU without mamba_ssm: a Python loop over
time). One group per width, so pytest-benchmark's table shows the ratio. d_model = first
--bench-widths / 2 (d_inner = the width), 2 layers, --bench-seqlen, --bench-batch, --bench-d-state,
fp32; skipped without transformers.
"""

import pytest
import torch

from ssm_kernels.bench import device_name
from ssm_kernels.bench.workload import synchronized

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("patched", [False, True], ids=["transformers", "ssm_kernels"])
def test_transformers_training_step(benchmark, bench_settings, patched):
    from ssm_kernels.integrations import apply_to_transformers
    transformers.logging.set_verbosity_error()
    device, d_inner = bench_settings["device"], bench_settings["widths"][0]
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=256, hidden_size=d_inner // 2, state_size=bench_settings["d_state"],
                                      num_hidden_layers=2, expand=2)
    model = transformers.MambaForCausalLM(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (bench_settings["batch"], bench_settings["seqlen"]), device=device)

    def step():
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss.detach()

    patch = apply_to_transformers() if patched else None
    try:
        timed = synchronized(step, device)
        assert torch.isfinite(timed())
        benchmark.group = f"transformers MambaForCausalLM training step d_inner={d_inner}"
        benchmark.extra_info.update(patched=patched, d_inner=d_inner, seqlen=bench_settings["seqlen"],
                                    batch=bench_settings["batch"], device=device_name(device))
        benchmark.pedantic(timed, rounds=bench_settings["rounds"], warmup_rounds=bench_settings["warmup"],
                           iterations=1)
    finally:
        if patch is not None:
            patch.undo()
