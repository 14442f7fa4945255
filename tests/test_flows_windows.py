"""Re-windowing a loaded flow shares its models and changes only the window math."""
import tiny_diffusers
from rectifid_core.flows import load_flow


def test_perflow_keeps_calls_per_window_and_shares_models():
    flow = load_flow(tiny_diffusers.cached_folder("sd15"), steps=8)
    two = flow.with_windows(2)
    assert two.components is flow.components and flow.num_windows == 4
    assert two.timesteps() == [[1000, 750], [500, 250]]
    assert two.window_gammas()[0] < flow.window_gammas()[0]  # a longer first window adds less signal


def test_euler_flow_rewindows_to_more_steps():
    flow = load_flow(tiny_diffusers.cached_folder("2rflow"))
    eight = flow.with_windows(8)
    assert eight.components is flow.components
    assert eight.timesteps() == [1000 * (1 - i / 8) for i in range(8)]
