"""The `loss` group: each option against its formula on fixed tensors, and the default
bit-identical to the plain MSE the module computed before the group existed."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from sdft.adapters.lora import LoRAMethod
from sdft.loss import DiffusionLoss
from sdft.models import build_random_pipeline
from sdft.models.pipeline import sd_noise_scheduler
from sdft.module import AdapterFineTuner
from sdft.train import run


def pixel_batch(seed):
    g = torch.Generator().manual_seed(seed)
    captions = ["a scribble of apple", "a scribble of a cat", "a scribble of tree"]
    return {"pixel_values": torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, "caption": captions}


def cached_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "latent_params": torch.randn(3, 8, 16, 16, generator=g) * 0.5,  # mean, log-variance
        "encoder_hidden_states": torch.randn(3, 77, 32, generator=g),
        "caption": ["a", "b", "c"],
    }


def loss_before_the_group(module, batch, g):
    """`AdapterFineTuner.diffusion_loss` as it was before the loss group (commit e7434da),
    verbatim but for `self`: the reference the default must match bit for bit. Computed here
    rather than recorded as float hexes, which differ between CPUs."""
    with torch.no_grad():
        if "latent_params" in batch:
            dist = DiagonalGaussianDistribution(batch["latent_params"].float())
        else:
            dist = module.vae.encode(batch["pixel_values"].to(module.vae.dtype)).latent_dist
        latents = dist.sample(generator=g).float() * module.vae.config.scaling_factor
    if "encoder_hidden_states" in batch and not module.trains_text_encoder:
        text = batch["encoder_hidden_states"]
    else:
        text = module.encode_prompt(batch["caption"])
    noise = torch.randn(latents.shape, generator=g, device=module.device)
    num_t = module.noise_scheduler.config.num_train_timesteps
    t = torch.randint(0, num_t, (latents.shape[0],), generator=g, device=module.device)
    noisy = module.noise_scheduler.add_noise(latents, noise, t)
    if module.noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = module.noise_scheduler.get_velocity(latents, noise, t)
    pred = module.unet(noisy, t, encoder_hidden_states=text).sample
    if "is_prior" in batch:
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
        prior = batch["is_prior"]
        weight = module.method.prior_loss_weight
        return per_sample[~prior].mean() + weight * per_sample[prior].mean()
    return F.mse_loss(pred.float(), target.float())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_default_loss_is_bit_identical_to_the_loss_before_the_group(prediction_type):
    pipe = build_random_pipeline("tiny", prediction_type=prediction_type)
    module = AdapterFineTuner(pipe, LoRAMethod(rank=4), None, None, loss=DiffusionLoss())
    module.method.prior_loss_weight = 0.5
    prior_batch = {**cached_batch(30), "is_prior": torch.tensor([False, True, True])}
    batches = [pixel_batch(10), cached_batch(20), pixel_batch(11), cached_batch(21), prior_batch]
    with torch.no_grad():
        for seed, batch in enumerate(batches):
            got = module.diffusion_loss(batch, torch.Generator().manual_seed(seed))
            want = loss_before_the_group(module, batch, torch.Generator().manual_seed(seed))
            assert got.item().hex() == want.item().hex(), f"batch {seed}"


def test_default_loss_config_trains_with_the_losses_before_the_group(make_cfg, monkeypatch):
    def train_losses(run_name):
        cfg = make_cfg("trainer.max_steps=3", "optim.lr=1e-2", "loss=default", run=run_name)
        (metrics,) = run(cfg)["output_dir"].rglob("metrics.csv")
        rows = csv.DictReader(metrics.open())
        return [float(r["train/loss"]) for r in rows if r["train/loss"]]

    losses = train_losses("default")
    monkeypatch.setattr(AdapterFineTuner, "diffusion_loss", loss_before_the_group)
    before = train_losses("before")
    assert len(losses) == 3 and losses == before  # bit for bit, all three steps


# -- weighting ---------------------------------------------------------------------------
T = torch.tensor([0, 1, 10, 100, 400, 999])
ERR = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1])


def per_sample(loss, prediction_type="epsilon", seed=0):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    scheduler = sd_noise_scheduler(prediction_type)
    mse = F.mse_loss(pred, target, reduction="none").mean((1, 2, 3))
    return loss.per_sample(pred, target, T, scheduler), mse, compute_snr(scheduler, T)


def test_min_snr_weights_are_min_snr_gamma_over_snr_for_epsilon():
    got, mse, snr = per_sample(DiffusionLoss(snr_gamma=5.0))
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(got, mse * expected)
    assert expected[0] < 0.01 and expected[-1] == 1.0  # low noise down-weighted


def test_min_snr_weights_are_min_snr_gamma_over_snr_plus_one_for_v_prediction():
    got, mse, snr = per_sample(DiffusionLoss(snr_gamma=5.0), "v_prediction")
    torch.testing.assert_close(got, mse * torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))


def test_debiased_weights_are_kohyas_one_over_sqrt_snr_capped_at_1000():
    got, mse, snr = per_sample(DiffusionLoss(debiased=True))
    torch.testing.assert_close(got, mse / snr.clamp(max=1000).sqrt())
    got, mse, snr = per_sample(DiffusionLoss(debiased=True), "v_prediction")
    torch.testing.assert_close(got, mse / (snr.clamp(max=1000) + 1))


def test_min_snr_epsilon_weight_is_one_not_nan_at_zero_terminal_snr():
    scheduler = sd_noise_scheduler("v_prediction")
    scheduler = type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)
    t = torch.tensor([999])
    assert compute_snr(scheduler, t).item() == 0.0
    scheduler.register_to_config(prediction_type="epsilon")
    assert DiffusionLoss(snr_gamma=5.0).weights(t, scheduler).item() == 1.0


@pytest.mark.parametrize("kind,torch_loss", [("huber", F.huber_loss), ("smooth_l1", None)])
def test_constant_huber_and_smooth_l1_are_twice_torchs_losses(kind, torch_loss):
    loss = DiffusionLoss(type=kind, huber_c=0.3, huber_schedule="constant")
    got, _, _ = per_sample(loss)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    if kind == "huber":
        expected = 2 * F.huber_loss(pred, target, reduction="none", delta=0.3)
    else:
        expected = 2 * F.smooth_l1_loss(pred, target, reduction="none", beta=0.3)
    torch.testing.assert_close(got, expected.mean((1, 2, 3)))


def test_scheduled_huber_thresholds_follow_kohyas_snr_and_exponential_forms():
    scheduler = sd_noise_scheduler()
    abar = scheduler.alphas_cumprod[T]
    sigma = ((1 - abar) / abar).sqrt()
    snr_c = DiffusionLoss(type="huber", huber_c=0.1, huber_schedule="snr")
    torch.testing.assert_close(snr_c.huber_threshold(T, scheduler), 0.9 / (1 + sigma) ** 2 + 0.1)
    exp_c = DiffusionLoss(type="huber", huber_c=0.1, huber_schedule="exponential")
    expected = torch.exp(math.log(0.1) / 1000 * T.float())  # 1 at t=0, ~huber_c at t=T
    torch.testing.assert_close(exp_c.huber_threshold(T, scheduler), expected)
    # and each sample's loss is F.huber_loss at its own threshold
    got, _, _ = per_sample(snr_c)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    c = snr_c.huber_threshold(T, scheduler)
    for i in range(6):
        one = 2 * F.huber_loss(pred[i], target[i], delta=c[i].item())
        torch.testing.assert_close(got[i], one)


# -- noise -------------------------------------------------------------------------------
LATENTS = torch.zeros(2, 4, 16, 16)


def sample(loss, seed=3):
    return loss.sample(LATENTS, sd_noise_scheduler(), torch.Generator().manual_seed(seed))


def test_noise_offset_shifts_each_channels_mean_by_offset_times_a_seeded_normal():
    noise, _ = sample(DiffusionLoss(noise_offset=0.1))
    g = torch.Generator().manual_seed(3)
    plain = torch.randn(LATENTS.shape, generator=g)
    shift = torch.randn(2, 4, generator=g)  # drawn right after the noise, before t
    torch.testing.assert_close((noise - plain).mean((2, 3)), 0.1 * shift)
    torch.testing.assert_close(noise.mean((2, 3)), plain.mean((2, 3)) + 0.1 * shift)


def test_pyramid_noise_adds_upsampled_coarse_noise_and_has_unit_std():
    noise, _ = sample(DiffusionLoss(multires_iterations=6, multires_discount=0.3))
    g = torch.Generator().manual_seed(3)
    expected = torch.randn(LATENTS.shape, generator=g)
    torch.randint(0, 1000, (2,), generator=g)  # t comes before the pyramid
    for i in range(1, 7):  # kohya's pyramid_noise_like with r in [2, 4)
        r = 2 + 2 * torch.rand((), generator=g).item()
        side = max(1, int(16 / r**i))
        coarse = torch.randn(2, 4, side, side, generator=g)
        expected = expected + F.interpolate(coarse, (16, 16), mode="bilinear") * 0.3**i
        if side == 1:
            break
    torch.testing.assert_close(noise, expected / expected.std())
    assert noise.std().item() == pytest.approx(1.0, abs=1e-6)


def test_input_perturbation_adds_fresh_noise_to_the_input_only():
    loss = DiffusionLoss(input_perturbation=0.1)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    perturbed = loss.perturb(noise, torch.Generator().manual_seed(5))
    extra = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(perturbed, noise + 0.1 * extra)
    assert DiffusionLoss().perturb(noise, torch.Generator()) is noise


def test_every_option_draws_only_from_the_steps_generator():
    loss = DiffusionLoss(
        noise_offset=0.1, multires_iterations=4, input_perturbation=0.1,
        timestep_sampling="logit_normal",
    )  # fmt: skip
    torch.manual_seed(0)
    a = sample(loss)
    torch.manual_seed(1)  # the global RNG plays no part
    b = sample(loss)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- timesteps ---------------------------------------------------------------------------
def timesteps(loss, n=20000):
    return loss.timesteps(n, 1000, torch.Generator().manual_seed(0), "cpu")


def test_uniform_timesteps_cover_exactly_the_configured_range():
    t = timesteps(DiffusionLoss(timestep_min=200, timestep_max=800))
    assert t.min().item() == 200 and t.max().item() == 799
    assert t.float().mean().item() == pytest.approx(499.5, abs=5)


def test_logit_normal_timesteps_stay_in_range_and_crowd_the_middle():
    t = timesteps(DiffusionLoss(timestep_sampling="logit_normal"))
    assert 0 <= t.min() and t.max() <= 999
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    # P(|N(0,1)| < logit(0.75)=1.0986) = 0.728 (uniform would give 0.5)
    assert middle == pytest.approx(0.728, abs=0.015)


@pytest.mark.parametrize("kind", ["bias_late", "bias_early"])
def test_biased_timesteps_draw_their_quarter_multiplier_times_as_often(kind):
    t = timesteps(DiffusionLoss(timestep_sampling=kind, bias_multiplier=2.0, bias_portion=0.25))
    part = (t >= 750) if kind == "bias_late" else (t < 250)
    assert part.float().mean().item() == pytest.approx(0.5 / 1.25, abs=0.015)  # 2x.25/(2x.25+.75)


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"type": "l1"}, "loss.type='l1' must be one of"),
        ({"timestep_sampling": "cosmap"}, "loss.timestep_sampling='cosmap' must be one of"),
        ({"timestep_min": 500, "timestep_max": 500}, "loss.timestep_min=500"),
        ({"snr_gamma": 0}, "loss.snr_gamma=0 must be > 0"),
        ({"snr_gamma": -5.0}, "loss.snr_gamma=-5.0 must be > 0"),
        ({"huber_schedule": "linear"}, "loss.huber_schedule='linear'"),
    ],
)
def test_bad_loss_settings_are_rejected_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        DiffusionLoss(**kwargs)


def test_timestep_max_past_the_schedule_is_rejected():
    with pytest.raises(ValueError, match="loss.timestep_max=1200 is past the scheduler's"):
        DiffusionLoss(timestep_max=1200).check(sd_noise_scheduler())


# -- prediction type and zero terminal SNR --------------------------------------------------
def test_v_prediction_with_zero_terminal_snr_trains_and_samples_with_a_matching_scheduler(
    make_cfg,
):
    from omegaconf import OmegaConf

    from sdft.eval.evaluate import load_adapter_pipeline
    from sdft.generate import SAMPLERS, set_sampler
    from sdft.train import build

    ztsnr = ["model.prediction_type=v_prediction", "model.zero_terminal_snr=true"]
    cfg = make_cfg(*ztsnr, "data.num_categories=3", "data.flip=false", "optim.lr=1e-2",
                   "trainer.max_steps=60", "method.rank=8")  # fmt: skip
    module = AdapterFineTuner(build(cfg.model), build(cfg.method), None, None)
    schedule = module.noise_scheduler
    assert schedule.config.prediction_type == "v_prediction"
    assert schedule.alphas_cumprod[-1].item() == 0.0  # t=999 is pure noise: SNR 0

    def fixed_loss():  # the v-prediction loss at t in [899, 1000), fixed noise
        g = torch.Generator().manual_seed(0)
        batch = {**cached_batch(0), "caption": ["a scribble of apple"] * 3}
        with torch.no_grad():
            module.loss = DiffusionLoss(timestep_min=899)  # includes the SNR-0 end
            return module.diffusion_loss(batch, g).item()

    before = fixed_loss()
    out = run(cfg)["output_dir"]
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    module.load_state_dict(state, strict=False)
    after = fixed_loss()
    assert math.isfinite(before) and after < before, (before, after)
    assert (out / "previews").is_dir()  # sampled at the end of fit with the matching scheduler

    # every sampler (previews, evaluation, generate.py) reads the training schedule
    samplers = {"preview": module.inference_pipeline().scheduler}
    adapter_cfg = OmegaConf.create({"adapter": str(out), "model": cfg.model, "method": cfg.method})
    samplers["evaluate"] = load_adapter_pipeline(adapter_cfg)[0].scheduler
    for name in SAMPLERS:
        pipe = build(cfg.model)
        set_sampler(pipe, name)
        samplers[f"generate {name}"] = pipe.scheduler
    for name, sampler in samplers.items():
        c = sampler.config
        assert c.prediction_type == "v_prediction", name
        assert c.rescale_betas_zero_snr and c.timestep_spacing == "trailing", name
        sampler.set_timesteps(4)
        assert sampler.timesteps[0].item() == 999, name  # sampling starts from pure noise


def test_zero_terminal_snr_with_epsilon_prediction_is_rejected_before_loading():
    with pytest.raises(
        ValueError, match="model.zero_terminal_snr=true needs model.prediction_type"
    ):
        build_random_pipeline("tiny", prediction_type="epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="model.prediction_type='sample' must be one of"):
        build_random_pipeline("tiny", prediction_type="sample")
