"""Figures are written (atomically) and read right: labelled axes, layers on x, legends when overlaid."""
import pytest

from layerskip.evaluation import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def captured(monkeypatch):
    """Record each figure's axes (labels, legend entries) as it is saved."""
    seen = []
    real = plots.save_figure

    def save(fig, path, **kwargs):
        seen.append([{"x": ax.get_xlabel(), "y": ax.get_ylabel(), "title": ax.get_title(),
                      "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else None,
                      "xticks": [t.get_text() for t in ax.get_xticklabels()]} for ax in fig.axes])
        real(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_figure", save)
    return seen


def rows(agreements):
    return [{"layer": i + 1, "agreement": a, "perplexity": 100 / (i + 1)} for i, a in enumerate(agreements)]


def test_layer_plot_one_and_two_models(tmp_path, captured):
    path = plots.plot_layer_analysis({"base": rows([0.1, 0.5, 1.0])}, tmp_path / "one.png")
    assert path.read_bytes()[:8] == PNG
    agree, ppl = captured[-1]
    assert agree["x"] == ppl["x"] == "exit layer (decoder layers run)"
    assert agree["y"] == "top-1 agreement with the final layer" and ppl["y"].startswith("perplexity")
    assert agree["legend"] is None  # a single model needs no legend

    plots.plot_layer_analysis({"before": rows([0.1, 0.2, 1.0]), "after": rows([0.6, 0.9, 1.0])},
                              tmp_path / "two.png", title="before vs after")
    agree, ppl = captured[-1]
    assert agree["legend"] == ppl["legend"] == ["before", "after"]
    assert (tmp_path / "two.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png"]  # no temp files left


def test_sweep_heatmap(tmp_path, captured):
    data = [{"exit_layer": e, "num_speculations": d, "speedup": 0.5 + e * 0.1 + d * 0.05}
            for e in (1, 2, 3) for d in (2, 4)]
    data.append({"exit_layer": 4, "num_speculations": 2, "speedup": ""})  # a missing value stays blank
    path = plots.plot_sweep_heatmap(data, tmp_path / "h.png", title="t")
    assert path.read_bytes()[:8] == PNG
    heat, colorbar = captured[-1]
    assert heat["x"] == "speculations per round d" and heat["y"] == "exit layer E"
    assert heat["xticks"] == ["2", "4"]
    assert colorbar["y"] == "speedup vs. autoregressive (×)"
