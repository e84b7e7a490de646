"""
The confidence cascade (generate.py --exit auto, eval.py --exits auto@T): each token leaves at the first exit whose
confidence reaches a threshold (CALM's rule), and tokens that left early get their deeper KV back-filled, exactly,
when a later token goes deeper. generate.py's cascade_decode drives it token by token; eval.py picks the same exits
from one teacher-forced pass. bytes_per_token counts what a token reads at an exit, the cascade's tries included.
"""
import torch

from balcony import BalconyModel

CONFIDENCE = ("prob", "margin")  # CALM's softmax measures: the top probability, or top-1 minus top-2
DEFAULT_CONFIDENCE = 0.9  # the threshold of a bare --exit auto


def exit_confidence(logits, measure: str = "prob"):
    # logits: (..., vocab) -> (...) how sure an exit is of its top token, from the untempered softmax
    top2 = logits.float().softmax(-1).topk(2, dim=-1).values
    return top2[..., 0] if measure == "prob" else top2[..., 0] - top2[..., 1]


class ConfidenceCascade:
    """Token-level confidence exits with exact KV back-fill (batch 1; the paper's limitations section, CALM's exit
    rule, FREE's and Apparate's exactness). A token runs layers 1..e1 and balcony e1; if the exit's confidence
    reaches `threshold` it leaves there, else it goes on to the next exit, and full depth always emits.

    A token that left at exit j has no KV in layers or balconies deeper than j. It waits in `pending[j]` with its
    layer-j hidden state, and the next token that goes past j takes it along: the waiting positions ride in the same
    forward as that token through layers j+1..j' and balcony j' (input_pos lists their positions, not necessarily
    contiguous: each query row is masked to the slots <= its own position, and every slot it may read is written in
    this pass or an earlier one). So a token at depth l reads layer-l KV of every earlier position, exactly what a
    full-depth run writes there, and each (layer, position) is computed once. The caches must hold every layer and
    every balcony."""

    def __init__(self, model: BalconyModel, threshold: float, measure: str = "prob"):
        self.model, self.threshold, self.measure = model, threshold, measure
        self.ladder = [*model.exit_layers, model.n_layers]
        self.pending = {}  # exit j -> (positions (k,), layer-j hidden states (1, k, D)) of tokens waiting there
        self.exits = []  # the exit that emitted each token
        self.backfilled = 0  # backbone (layer, position) pairs run for earlier tokens' positions

    def __call__(self, idx, input_pos):
        """idx (1, T) at positions input_pos (T,) -> (1, vocab) logits for the last position, from the first exit
        confident enough (the prefill is a T-token step whose other positions ride along)."""
        m = self.model
        h, pos, prev = m.model.tok_embeddings(idx), input_pos, 0
        for e in self.ladder:
            h = m.run_layers(h, prev, e, pos)  # (1, riders, D), this step's tokens last
            self.backfilled += (pos.numel() - idx.size(1)) * (e - prev)
            # balcony e runs on every rider: its cache must hold them for later tokens that leave at e
            logits = m.model.output(m.exit_hidden(e, h, pos)[:, -1])
            if e == m.n_layers:
                self.exits.append(e)
                return logits
            if exit_confidence(logits, self.measure).item() >= self.threshold:
                self.pending[e] = self._join(e, pos, h)
                self.exits.append(e)
                return logits
            pos, h = self._join(e, pos, h)  # going deeper: the positions waiting at e come along
            prev = e

    def _join(self, e, pos, h):
        # the positions waiting at exit e (no longer waiting), then pos: (k + T,) positions, (1, k + T, D) states
        if e not in self.pending:
            return pos, h
        old_pos, old_h = self.pending.pop(e)
        return torch.cat([old_pos, pos]), torch.cat([old_h, h], 1)


def nbytes(module) -> int:
    """Bytes of the weights a module holds, in the form it holds them (float, or quantize.py's int4 / int8 buffers);
    KV caches are not weights."""
    return sum(t.nbytes for n, t in [*module.named_parameters(), *module.named_buffers()] if "kv_cache" not in n)


def bytes_per_token(model: BalconyModel, exit, cascade: bool = False) -> int:
    """Bytes of weights a token decoded at batch 1 reads, which bound its speed: backbone layers 1..exit (None: all),
    its balcony (or the final norm) and the shared head. In the cascade (ConfidenceCascade) a token also tried every
    shallower exit, a balcony and a head each; the positions it back-fills ride in the same passes and read nothing
    more."""
    m = model.model
    exit = None if exit == model.n_layers else exit
    head = nbytes(m.output)
    tried = model.exit_layers[:model.exit_layers.index(exit) if exit is not None else None] if cascade else []
    return (sum(nbytes(layer) for layer in m.layers[:exit]) + nbytes(m.norm if exit is None else model.exits[str(exit)])
            + head + sum(nbytes(model.exits[str(k)]) + head for k in tried))
