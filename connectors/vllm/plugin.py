"""`vllm.general_plugins` entry point: registers KVStoreConnector by name. vLLM loads general
plugins once per process but in every process, and register_connector raises on a duplicate
name, so this is guarded and safe to call any number of times."""

CONNECTOR_NAME = "KVStoreConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvstore.connectors.vllm", CONNECTOR_NAME)
