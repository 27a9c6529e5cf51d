"""ImageNet preprocessing constants shared by the Pillow and DALI image pipelines."""

MEAN = (0.485, 0.456, 0.406)  # per-channel mean of ImageNet RGB in [0, 1]
STD = (0.229, 0.224, 0.225)  # per-channel standard deviation
RESIZE_RATIO = 256 / 224  # shorter side is resized to S * 256/224 before the S x S crop (ImageNet convention)
