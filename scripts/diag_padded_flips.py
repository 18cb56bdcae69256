"""Per-token bf16 errors of a padded batch (row 1), pcg captured and pcg eager vs the unwrapped bf16 and fp32 models, on DBRX and Mixtral: tells a routing flip (one token, then weaker on the later ones; captured == eager) from a logic error. GPU; session 17 output in bench/results/diag_dbrx_s17.log."""
import copy, sys, os, torch
sys.path.insert(0, "tests")
import pcg
from hf_models import build, padding_mask, VOCAB
def rel(a, b): return ((a.float()-b.float()).norm()/b.float().norm()).item()
for family in ("dbrx", "mixtral"):
    m32 = build(family, dtype=torch.float32, device="cuda")
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    cap = pcg.wrap(copy.deepcopy(m16), buckets=[8, 32, 64], progress=False).capture()
    eag = pcg.wrap(copy.deepcopy(m16), capture=False, progress=False)
    for seed in (2, 3, 4):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (3, 11), generator=g).cuda()
        for side in ("left", "right"):
            mask = padding_mask([11, 6, 2], 11, side).cuda()
            with torch.inference_mode():
                r32 = m32(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
                r16 = m16(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            c = cap(ids, attention_mask=mask).logits.float()
            e = eag(ids, attention_mask=mask).logits.float()
            keep = mask.bool()
            row = 1
            k = keep[row]
            pt = lambda a, b: ((a[row][k]-b[row][k]).norm(dim=-1)/b[row][k].norm(dim=-1)).cpu().numpy().round(3)
            print(family, seed, side, "row1 per-token: cap-vs-r16", pt(c, r16), "eag-vs-r16", pt(e, r16), "r16-vs-r32", pt(r16, r32), "cap-vs-r32", pt(c, r32))
