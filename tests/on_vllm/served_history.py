"""A worker extension for ``vllm serve`` in the tests (``--worker-extension-cls
served_history.DesapHistory``): with ``VLLM_SERVER_DEV_MODE=1`` the server's ``/collective_rpc``
calls these methods by name on every worker, so a test reads what DeSAP kept for the requests it
sent through the OpenAI API (:func:`kept`), position by position, as the offline tests read it."""


class DesapHistory:
    def desap_history(self) -> dict:
        """The model's class and its DeSAP records (``PruneRecord``) since the last
        :meth:`desap_forget`, as JSON (``probe.history``; ``servers.Server.records`` reads them back)."""
        from probe import history

        return history(self.get_model())

    def desap_forget(self) -> None:
        from probe import forget_job

        forget_job(self.get_model())
