"""Request preparation: OpenAI requests turned into engine requests (refusing, with a clear 400, what
the engine cannot honour), and the tally of what the engine answers. No HTTP here: ``api/`` frames
the results."""
