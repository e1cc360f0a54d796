from dispatcher.toolbox import recipients, schedule_messages, send_test_message

__all__ = ["recipients", "schedule_messages", "send_test_message"]
