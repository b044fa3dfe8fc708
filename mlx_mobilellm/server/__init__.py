"""`mlx-mobilellm server`: an OpenAI-compatible HTTP server (chat and text completions, streamed
or whole) in front of one model. app.py is the HTTP side, completions.py turns requests into
jobs and answers, protocol.py checks request fields, worker.py runs the model."""
