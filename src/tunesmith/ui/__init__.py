"""`tunesmith ui`: a local web page over a runs folder: list and open runs (curves that grow while a run
trains), start a run from an example or pasted YAML and watch its log, compare two runs, chat with a tuned
model. server.py starts it, app.py is its HTTP API, views/jobs/talk do the work, static/ is the page."""
