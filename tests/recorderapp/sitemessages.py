"""A messenger that records its lifecycle to a file, to watch real worker processes."""

import os

from sitemessage.utils import MessengerBase, register_messenger_objects


class RecordingMessenger(MessengerBase):
    alias = "recorder"

    def _log(self, event: str) -> None:
        path = os.environ.get("RECORDER_LOG")
        if path:
            with open(path, "a") as log:
                log.write(f"{os.getpid()} {event}\n")

    def before_send(self) -> None:
        self._log("before_send")

    def after_send(self) -> None:
        self._log("after_send")

    def send(self, message_cls, message_model, dispatch_models):
        self._log(f"send {len(dispatch_models)}")
        for dispatch in dispatch_models:
            self.mark_sent(dispatch)


register_messenger_objects(RecordingMessenger())
