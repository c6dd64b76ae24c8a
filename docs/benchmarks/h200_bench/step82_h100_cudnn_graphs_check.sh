# step 82 (h200_perf.md): the cuDNN graphs cache bounded; run from the repository root on the GPU
# (the carried wheels, unless experiments/fa4_env.sh put them there already, whose path is kept:
# gpu_session.sh typing runs this after it, step 84)
[ -d /tmp/site/beartype ] || { mkdir -p /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
python - <<'PY'
import torch, ringattn
from ringattn.computers.sdpa import SDPAComputer
from ringattn.kernels import cudnn_graphs as cg
from ringattn.reference import dilated_attention as ref, TOLERANCE
SDPAComputer.cuda_forward = "torch"; cg.MAX_GRAPHS = 3
print("cudnn", cg.cudnn is not None, torch.cuda.get_device_name())
worst = 0.0
for mixing in ("head_groups", "lse"):
    for causal in (False, True):
        m = ringattn.DilatedAttention((256, 512), (1, 2), mixing=mixing, causal=causal, compile=False)
        for turn in range(2):
            for n in (512, 1024, 1536, 768):
                g = torch.Generator("cuda").manual_seed(n)
                q, k, v = (torch.randn(1, n, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
                out = m(q, k, v).double()
                r = ref(q.double(), k.double(), v.double(), segment_lengths=(256, 512), dilation_rates=(1, 2), mixing=mixing, causal=causal)
                err = ((out - r).norm() / r.norm()).item(); worst = max(worst, err)
                assert err <= TOLERANCE[torch.bfloat16], (mixing, causal, n, err)
                assert len(cg._graphs) <= 3, len(cg._graphs)
print("graphs kept", len(cg._graphs), "worst rel err", f"{worst:.2e}", "bound", TOLERANCE[torch.bfloat16], "OK")
PY
