"""AWS endpoints: the IMDSv2 client, region resolution, the S3 client factory, their
outage watch, and the preflight checks run before the daemon starts."""
