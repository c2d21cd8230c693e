"""A direct, one-fact-at-a-time transcription of MEMIT's compute_z (docs/methods.md §3), for tests only.

Written independently of editlib.editing.values: plain loops, torch.optim.Adam, full logits.
"""

from __future__ import annotations

import torch


def reference_z(model, tokenizer, request, templates, hook_module, hp):
    target = tokenizer(" " + request.target_new, add_special_tokens=False)["input_ids"]
    texts = [t.format(request.prompt).replace("{}", request.subject) for t in templates]
    rows = [tokenizer(text)["input_ids"] + target[:-1] for text in texts]
    kl_row = tokenizer(hp.kl_prompt.replace("{}", request.subject))["input_ids"]
    heads = [t.format(request.prompt) for t in templates] + [hp.kl_prompt]
    lookup = [len(tokenizer(h[: h.index("{}")] + request.subject)["input_ids"]) - 1 for h in heads]
    all_rows = rows + [kl_row]
    width = max(len(r) for r in all_rows)
    ids = torch.full((len(all_rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(all_rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    delta = torch.zeros(model.config.hidden_size, device=device, requires_grad=True)
    state = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if "init" not in state:
            state["init"] = out[0, lookup[0]].detach().float().clone()
        out = out.clone()
        for i, idx in enumerate(lookup):
            out[i, idx] = out[i, idx] + delta.to(out.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = model.get_submodule(hook_module).register_forward_hook(hook)
    optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
    try:
        for it in range(hp.v_num_grad_steps):
            optimizer.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits, -1)
            nll = 0.0
            for i, r in enumerate(rows):
                start = len(r) - len(target)
                for j, token in enumerate(target):
                    nll = nll - logp[i, start + j, token] / len(target)
            nll = nll / len(rows)
            kl_logp = logp[len(rows), lookup[-1]]
            if "kl_init" not in state:
                state["kl_init"] = kl_logp.detach().clone()
            kl = (kl_logp.exp() * (kl_logp - state["kl_init"])).sum()
            decay = hp.v_weight_decay * delta.norm() / state["init"].norm() ** 2
            loss = nll + hp.kl_factor * kl + decay
            if loss < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
                break
            loss.backward()
            optimizer.step()
            max_norm = hp.clamp_norm_factor * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        handle.remove()
    return (state["init"] + delta).detach(), float(loss.detach())
