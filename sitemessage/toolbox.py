from dispatcher.tasks import schedule_messages
from dispatcher.toolbox import recipients, send_test_message

__all__ = ["recipients", "schedule_messages", "send_test_message"]
