"""autoresearch harness: the commands an agent should not have to do by hand."""
