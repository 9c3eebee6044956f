"""What `dicomnet route` is: routing rules, a durable queue per destination, forwarding."""
