"""The analysis: a run's documents to flux integrals, h and masses with type A / type B
uncertainties, after the procedures of the seed papers (``/work/shared/seeds``).

Pure functions of recorded arrays (numpy; no bus, no simulator, no in-process stack).
:func:`~kibble.services.analysis.pipeline.analyze_run` is the one entry point, used by
``kibble analyze`` (a recording), the offline campaign and the campaign benchmark alike. One
module per concept, in SI units with the unit in every name, shapes in the docstrings:

- :mod:`.constants`: h, e, K_J, R_K and their conventional 1990 values;
- :mod:`.velocity`: NIST-4 velocity mode, Bl(z) of a set of sweeps (seed 001);
- :mod:`.force`: NIST-4 force mode, Bl(0) from mass-on / mass-off weighings (eqs. 16-19);
- :mod:`.triplet`: the triplet regression, h and the mass (eqs. 13-15, 22);
- :mod:`.gradient`: EFB dC/dz from gradient sweeps and kappa (seed 000 sections 3.1, 4.1);
- :mod:`.weighing`: EFB weighing, F = kappa V^2 and eq. (17);
- :mod:`.uncertainty`: the published budgets (seed 001 Table III, seed 000 Table 1),
  small-sample widening, type A and B combined;
- :mod:`.documents`: the run documents and their events by stream;
- :mod:`.nist4`, :mod:`.efb`: the pipelines, a run's events to its result;
- :mod:`.pipeline`: the documents of a run to its result, the analysis chosen by the plan;
- :mod:`.plots`: the figures of a result.

From a realization to the key comparison (issue 15):

- :mod:`.xrcd`: the XRCD route, a 28Si sphere's density, N_A and the mass realized with N_A
  fixed (seed 003);
- :mod:`.comparison`: a key comparison of realizations, KCRV and degrees of equivalence (seed 002);
- :mod:`.inputfiles`: their TOML input files, errors naming file, line and field;
- :mod:`.comparisonplots`: seed 002's figures 2-4.

Every public name is also here, as ``kibble.services.analysis.NAME``.
"""

from kibble.services.analysis.comparison import *  # noqa: F401,F403
from kibble.services.analysis.comparisonplots import *  # noqa: F401,F403
from kibble.services.analysis.constants import *  # noqa: F401,F403
from kibble.services.analysis.documents import *  # noqa: F401,F403
from kibble.services.analysis.efb import *  # noqa: F401,F403
from kibble.services.analysis.force import *  # noqa: F401,F403
from kibble.services.analysis.gradient import *  # noqa: F401,F403
from kibble.services.analysis.inputfiles import *  # noqa: F401,F403
from kibble.services.analysis.nist4 import *  # noqa: F401,F403
from kibble.services.analysis.pipeline import *  # noqa: F401,F403
from kibble.services.analysis.plots import *  # noqa: F401,F403
from kibble.services.analysis.triplet import *  # noqa: F401,F403
from kibble.services.analysis.uncertainty import *  # noqa: F401,F403
from kibble.services.analysis.velocity import *  # noqa: F401,F403
from kibble.services.analysis.weighing import *  # noqa: F401,F403
from kibble.services.analysis.xrcd import *  # noqa: F401,F403
