"""
The two networks of the comparison, and a GPT, built bottom-up from small modules. Torch only.

    LeNet5(1, 10, image_size=28)       61,706 parameters   (MNIST, Fashion-MNIST)
    LeNet5(3, 10, image_size=32)       83,126 parameters   (CIFAR-10)
    ResNet18(3, 10)                11,173,962 parameters   (CIFAR-10; any image size, global pooling)
    GPT(**GPT_SHAPES["gpt-tiny"])     809,856 parameters   (characters: 65 tokens, 64 of context)
    GPT(**GPT_SHAPES["gpt2"])     124,475,904 parameters   (GPT-2 small; vocabulary padded to 50,304)

A GPT's count is its unique parameters: the output layer shares the token embedding's weight.
"""
import math

import torch
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
            raise ValueError(f"LeNet5 needs images of at least 12x12 pixels, got {image_size}")
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before it."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head  # n_embd % n_head == 0, checked by GPT
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # queries, keys and values of every head in one matmul
        self.c_proj = nn.Linear(n_embd, n_embd)  # the heads mixed back into the residual stream

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # (B, T, C) -> (B, n_head, T, C / n_head): the heads attend independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_head, T, C / n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads side by side again: (B, T, C)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: widen to 4C, GELU, back to C."""

    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):  # (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """A transformer block, pre-LayerNorm: attention then MLP, each added to the residual stream."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):  # (B, T, C)
        x = x + self.attn(self.ln_1(x))  # positions exchange information
        x = x + self.mlp(self.ln_2(x))  # each position computes on its own
        return x  # (B, T, C)


GPT_SHAPES = {
    "gpt-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}


class GPT(nn.Module):
    """A decoder-only transformer as GPT-2 (Radford et al., 2019), in the manner of nanoGPT.

    token + learned position embedding -> n_layer Blocks -> LayerNorm -> lm_head (weight tied to
    the token embedding) -> logits over the vocabulary at every position. No dropout.
    Unique parameters, C = n_embd, V = vocab_size, T = block_size:
    n_layer * (12 C^2 + 13 C) + V C + T C + 2 C, that is 809,856 for GPT_SHAPES["gpt-tiny"]
    and 124,475,904 for GPT_SHAPES["gpt2"].
    """

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head}): "
                             f"each head gets n_embd // n_head channels")
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)  # token id -> vector
        self.wpe = nn.Embedding(block_size, n_embd)  # position 0 .. block_size-1 -> vector
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, C) tensor reads tokens in and writes them out
        # GPT-2's initialisation: N(0, 0.02) weights and zero biases (LayerNorms keep ones and zeros), and
        # the projections that write into the residual stream scaled down by sqrt(2 n_layer), as each of
        # the 2 n_layer of them adds to it
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx):  # (B, T) int64 token ids
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"a sequence of {T} tokens is longer than the block size {self.block_size} "
                             f"(the context length): pass at most the last {self.block_size} tokens, "
                             f"idx[:, -{self.block_size}:], or build the GPT with block_size >= {T}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)
        return self.lm_head(x)  # (B, T, vocab_size)


def build_model(name, in_channels, num_classes, image_size):
    """The model called `name` ('lenet5' or 'resnet18') for images of this shape."""
    if name == "lenet5":
        return LeNet5(in_channels, num_classes, image_size)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes)
    raise ValueError(f"unknown model {name!r}: choose 'lenet5' or 'resnet18'")
