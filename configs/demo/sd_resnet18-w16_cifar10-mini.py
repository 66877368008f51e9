# The front-door demo: a quarter-width CIFAR ResNet-18 trained with self-distillation on the embedded
# 2,000-image CIFAR-10 subset (demo_data/cifar10_mini), sized for 2 CPU cores in a few minutes.
# Run it with `make demo` (or `python examples/quickstart.py`).
_base_ = ['mmpretrain::resnet/resnet18_8xb16_cifar10.py']

# The one line that adds self-distillation to any MMPretrain classification config:
model = dict(
    type='sd_plugin.SelfDistillClassifier',
    # Demo-only changes, to fit a CPU: quarter width (channels 16-32-64-128).
    backbone=dict(stem_channels=16, base_channels=16),
    head=dict(in_channels=128),
)

data_root = '{{ fileDirname }}/../../demo_data/cifar10_mini'
# JPEG files load as BGR: convert to RGB to use the base config's RGB mean/std.
data_preprocessor = dict(to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline),
)
val_dataloader = dict(
    batch_size=100,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='test',
                 pipeline=test_pipeline),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='sd_plugin.MultiExitAccuracy')
test_evaluator = val_evaluator

max_epochs = 15
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=max_epochs, eta_min=0.0)
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=max_epochs)
auto_scale_lr = dict(enable=False)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
