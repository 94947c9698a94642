"""The serving room: `hamtune serve`, a local page and JSON API that show one model file's answer for one image.

    app.py        the FastAPI app, its limits and errors, uvicorn
    predictor.py  a loaded model file for single images: decode as training did, probabilities, Grad-CAM
    page.html     the page

May import hamtune.final (the model file), hamtune.training, hamtune.data and the shared modules; nothing imports it
but the command line.
"""
