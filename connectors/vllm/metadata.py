"""Scheduler -> worker metadata of one step. vLLM carries it between processes with its own
serializer; it holds only keys (bytes) and block ids (ints)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

SKIP_BLOCK = -1  # kvstore.store.SKIP_BLOCK: the engine already holds this block


@dataclass
class ChunkTransfer:
    """Chunks of one request: chunk i is blocks block_ids[i*bpc:(i+1)*bpc] (scheduler block ids)
    and chunk first_chunk + i of the request's tokens."""
    req_id: str
    keys: list[bytes]
    block_ids: list[int]
    first_chunk: int = 0


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[ChunkTransfer] = field(default_factory=list)
    saves: list[ChunkTransfer] = field(default_factory=list)
    early_load_id: int = 0  # != 0: a worker in the scheduler's process started these loads already
    # Blocks the step writes (KV of its tokens, loads): newly allocated blocks of every request,
    # past its GPU prefix hit. A save still reading one of them must finish first.
    written_block_ids: list[int] = field(default_factory=list)
