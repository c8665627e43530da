"""The event dispatcher: reads events from the bus and delivers them to a sink in batches."""
