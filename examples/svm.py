"""The SVM workflow from the plugin's documentation, every electron on GCPBatchExecutor.

GCPBatchExecutor() takes project, bucket, image, topic and endpoints from the [executors.gcpbatch]
section of the Covalent config, which `./deploy.sh up` or `covalent-gcpbatch local up` writes.

The worker image has only what the worker needs, so each electron brings its own packages with
ct.DepsPip (installed in the task's container before it runs; or build an image with them:
`./deploy.sh image --requirements requirements.txt`). Each electron imports them itself: the worker
unpickles the electron before its DepsPip runs, so a module-level `from sklearn import ...` would
make it fail on import. The dispatching environment needs neither numpy nor scikit-learn.
"""

import covalent as ct

deps_pip = ct.DepsPip(packages=["numpy", "scikit-learn"])
executor = ct.executor.GCPBatchExecutor(vcpus=2, memory=1024, time_limit=600)


@ct.electron(executor=executor, deps_pip=deps_pip)
def load_data():
    from numpy.random import permutation
    from sklearn import datasets

    iris = datasets.load_iris()
    perm = permutation(iris.target.size)
    return iris.data[perm], iris.target[perm]


@ct.electron(executor=executor, deps_pip=deps_pip)
def train_svm(data, C, gamma):
    from sklearn import svm

    X, y = data
    clf = svm.SVC(C=C, gamma=gamma)
    clf.fit(X[90:], y[90:])
    return clf


@ct.electron(executor=executor, deps_pip=deps_pip)
def score_svm(data, clf):
    X_test, y_test = data
    return clf.score(X_test[:90], y_test[:90])


@ct.lattice
def run_experiment(C=1.0, gamma=0.7):
    data = load_data()
    clf = train_svm(data=data, C=C, gamma=gamma)
    return score_svm(data=data, clf=clf)


if __name__ == "__main__":
    dispatch_id = ct.dispatch(run_experiment)()
    result = ct.get_result(dispatch_id=dispatch_id, wait=True)
    print(f"dispatch {dispatch_id}: {result.status}")
    if str(result.status) != "COMPLETED":
        raise SystemExit(f"workflow did not complete: {result.error or result.get_all_node_results()}")
    print(f"SVM score: {result.result:.3f}")
