"""``cpsim serve``: an OpenAI-compatible gateway over the control plane (``pip install
cpsim[serve]``). ``cpsim.serve.app.create_app(Gateway(manager, ServerSettings(...)))`` is
the ASGI app; ``experiments/serve.py`` builds one from conf/serve/config.yaml and runs it
under uvicorn. (The app is not imported here: ``cpsim.serve.limits`` needs no web stack.)"""
