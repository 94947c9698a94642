"""The training room: one run of plain PyTorch, knowing nothing of Ray, the search or reports.

    config.py    TrainConfig: every setting of a run and its checks (pydantic; no torch)
    model.py     create_model / build_model on timm: backbone, optional metadata features, head
    weights.py   where pretrained ImageNet weights come from; reading weights files safely
    augment.py   batched augmentation scaled by one strength in [0, 1]
    imbalance.py none | weighted_loss | oversample | focal
    batches.py   an epoch's batches: gathered, on the device, augmented, prefetched
    loop.py      fit / train_one_epoch / evaluate (torchvision references style)
    predict.py   probabilities for uint8 images, test-time augmentation
    state.py     checkpoint state: save, load, exact resume
    metrics.py   balanced accuracy and the rest; the lesion bootstrap
    device.py    the device and autocast precision of a run

May import hamtune.data, hamtune.vocab, hamtune.errors and hamtune.io; never Ray, search, final, reports or serve.
This file imports nothing, so that reading a config does not load torch.
"""
