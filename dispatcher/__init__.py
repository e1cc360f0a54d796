"""The sitemessage Django app: models, message types, the scheduling API, the delivery pipeline."""
