"""The demo's blog app: authors, posts, tags, comments, counters and an audit log."""
