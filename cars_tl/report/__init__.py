"""The report: reads artifacts, writes Markdown and HTML."""
