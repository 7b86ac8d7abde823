"""GPU-memory savings that move frozen or saved tensors to host memory, exact in value: the embedding table
looked up on the CPU, and checkpointed layer inputs kept in CPU memory between the forward and the backward.
TutorModule's ``embeddings_on_cpu`` and ``offload_checkpoints`` options use them; the planner models both.
"""

from __future__ import annotations

import torch
from torch import nn


class HostEmbedding(nn.Module):
    """A frozen nn.Embedding kept in CPU memory: the batch's ids are looked up there and only the looked-up
    rows travel to the ids' device (512 rows of Phi-2: 2.5 MB, against its 250 MB table).

    The table is held outside the module tree (``self.__dict__``), so ``.to(device)`` (Lightning moving
    the model to the GPU) leaves it on the CPU, and it is neither a parameter nor in the state dict.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        if embedding.weight.requires_grad:
            raise ValueError("HostEmbedding holds a frozen table; this embedding is trainable")
        self.__dict__["table"] = embedding.to("cpu")
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads the input embeddings' weight for its dtype and device (e.g. when generating)
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table(input_ids.to("cpu"))
        if input_ids.device.type == "cuda":
            return rows.pin_memory().to(input_ids.device, non_blocking=True)
        return rows.to(input_ids.device)


def keep_embeddings_on_host(model: nn.Module) -> HostEmbedding:
    """Replace ``model``'s input embedding (a transformers PreTrainedModel) with a HostEmbedding."""
    host = HostEmbedding(model.get_input_embeddings())
    model.set_input_embeddings(host)
    return host


def saved_tensors_on_host(device: torch.device) -> torch.autograd.graph.save_on_cpu:
    """Tensors autograd saves inside the block (with non-reentrant checkpointing: the checkpointed layers'
    inputs) wait for the backward in CPU memory, pinned on CUDA (torch.autograd.graph.save_on_cpu). On the
    CPU the same hooks run and move nothing."""
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
