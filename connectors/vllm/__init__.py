"""kvstore's vLLM KV connector (KVConnectorBase_V1, vLLM 0.24 - 0.33).

    --kv-transfer-config '{"kv_connector": "KVStoreConnector", "kv_role": "kv_both",
                           "kv_connector_module_path": "kvstore.connectors.vllm",
                           "kv_connector_extra_config": {...}}'

or, once the package is installed, just "kv_connector": "KVStoreConnector" (registered by the
`vllm.general_plugins` entry point `register`). Extra config keys: see settings.py.
"""
from .connector import KVStoreConnector
from .plugin import register

__all__ = ["KVStoreConnector", "register"]
