"""
The two networks of the comparison, built bottom-up from small modules. Torch only.

    LeNet5(1, 10, image_size=28)   61,706 parameters   (MNIST, Fashion-MNIST)
    LeNet5(3, 10, image_size=32)   83,126 parameters   (CIFAR-10)
    ResNet18(3, 10)            11,173,962 parameters   (CIFAR-10; any image size, global pooling)
"""
import torch.nn as nn
import torch.nn.functional as F


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling.

    conv 6@5x5 (pad 2) -> pool -> conv 16@5x5 -> pool -> fc 120 -> fc 84 -> fc num_classes.
    61,706 parameters for 1-channel 28x28 input and 10 classes; 83,126 for 3-channel 32x32.
    """

    def __init__(self, in_channels=1, num_classes=10, image_size=28):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        side = (image_size // 2 - 4) // 2  # 28 -> 28 -> 14 -> 10 -> 5
        if side < 1:
            raise ValueError(f"LeNet5 needs images of at least 10x10 pixels, got {image_size}")
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):  # (B, C, H, W)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 6, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, side, side)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # (B, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual; a 1x1 conv-BN shortcut where the shape changes."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016) with the CIFAR stem: a 3x3 stride-1 conv and no max-pool.

    Four stages of two BasicBlocks, widths 64, 128, 256, 512, then global average pooling
    and one linear layer. 11,173,962 parameters for 3 input channels and 10 classes.
    """

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, width = [], 64
        for out_width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages += [BasicBlock(width, out_width, stride), BasicBlock(out_width, out_width)]
            width = out_width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):  # (B, C, 32, 32)
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, 32, 32)
        x = self.stages(x)  # (B, 512, 4, 4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 512)
        return self.fc(x)


def build_model(name, in_channels, num_classes, image_size):
    """The model called `name` ('lenet5' or 'resnet18') for images of this shape."""
    if name == "lenet5":
        return LeNet5(in_channels, num_classes, image_size)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}: choose 'lenet5' or 'resnet18'")
